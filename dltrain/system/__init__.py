"""The machine and the process: devices, torch.distributed, host speed settings, the local
launcher, signals, atomic writes and the out-of-memory handler."""
