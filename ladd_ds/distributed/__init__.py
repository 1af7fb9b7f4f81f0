"""Distributed concerns: rank helpers (`ranks`, safe before init) and engine wiring (`engines`,
the only module that imports deepspeed)."""
