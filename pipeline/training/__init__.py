"""Training and measuring one network: the loop, precision, calibration, metrics."""
