"""Seeds derived from (seed, stream, counter): every random draw of a run is a function of these.

Each kind of random draw has its own stream, a named constant below; ``derive_seed`` is only
ever called with one of them (never a literal number), so that two kinds of draws never share
a generator. The numbers are part of what a checkpoint replays: changing one changes every run
that resumes across the change.
"""

from __future__ import annotations

import numpy as np

ORDER = 1  # (seed, ORDER, epoch): the epoch's sample order
AUGMENT = 2  # (seed, AUGMENT, step): the step's augmentation parameters (on the device)
CLUSTER = 3  # (seed, CLUSTER, epoch): DeepCluster's clustering at the start of the epoch
# (seed, CROPS, step): the step's crops cut by the streaming loader's workers (on the CPU, so that
# they do not depend on the device or on which worker decodes which batch)
CROPS = 4
SELECT = 5  # (seed, SELECT, step): the selector's choices (top-k sampling, online k-means seeding; on the CPU)


def derive_seed(*parts: int) -> int:
    """An independent 63-bit seed for each tuple of non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)
