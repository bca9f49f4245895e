"""The dead-order warning: after warm-up, a spread below the floor (or saturated sigmoids) for
``patience`` logs warns once, and again only after the order has recovered."""

from lomdm_dist.train.order_monitor import OrderMonitor


def feed(monitor, series, saturated=0.0, start=1):
    return [monitor.update(start + i, {"k_phi_std": s, "k_phi_saturated": saturated}) for i, s in enumerate(series)]


def test_warns_once_after_patience_logs_below_the_floor_and_not_during_warm_up():
    m = OrderMonitor(warmup_steps=3, spread_floor=0.01, patience=2)
    out = feed(m, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])            # steps 1..6; 1..3 are warm-up
    assert out[:4] == [None] * 4 and out[4] is not None and "no learned order" in out[4] and out[5] is None
    # recovery re-arms it
    assert feed(m, [0.2], start=7) == [None]
    assert feed(m, [0.001, 0.001], start=8)[1] is not None


def test_saturation_counts_as_dying_and_no_lomdm_keys_means_no_judgement():
    m = OrderMonitor(warmup_steps=0, spread_floor=0.01, patience=1)
    msg = feed(m, [0.3], saturated=0.97)[0]
    assert msg is not None and "saturated" in msg
    assert OrderMonitor(0, 0.01, 1).update(5, {"loss": 1.0}) is None
    assert OrderMonitor(0, 0.0, 1).update(5, {"k_phi_std": 0.0}) is None          # floor 0 disables
