"""The pieces of :class:`fisnet.train.Trainer`, one job each.

    config        TrainConfig, RESUME_FREE, the training errors
    device        the device (clear errors), determinism, mixed precision
    distributed   torchrun: process group, launcher watchdog, initial weights, gradient all-reduce
    data          the DistributedSampler and DataLoader of a run
    checkpoint    atomic saves, safe loads, RNG states, the resume check
    sums          step losses summed on the device, read once per logging interval
    logs          log.json / log.csv, the epoch summary line, the progress bar

fisnet.train joins them into the loop (and re-exports the public names).
"""
