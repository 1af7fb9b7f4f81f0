import torch

from ladd_ds.training.ema import ShardedEMA


def test_ema_is_an_exponential_moving_average_and_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = ShardedEMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1.0))
    other = ShardedEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])
