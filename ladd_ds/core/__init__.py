"""The bottom layer: rectified-flow math, per-sample noise and file helpers; imports nothing else of ladd_ds."""
