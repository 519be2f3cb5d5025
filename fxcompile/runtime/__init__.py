"""What a compiled model runs while it trains: the cast op and its kernels, the
fixed-point optimizer, telemetry."""
