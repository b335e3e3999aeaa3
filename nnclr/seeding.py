"""Seeds derived from (seed, stream, counter): every random draw of a run is a function of these.

The streams in use: 1 the epoch's sample order, 2 the step's augmentation (on the device),
3 DeepCluster's clustering, 4 the step's crops cut by the streaming loader's workers (on the CPU,
so that they do not depend on the device or on which worker decodes which batch), 5 the step's
choices of the method's selector (top-k sampling, online k-means seeding; on the CPU).
"""

from __future__ import annotations

import numpy as np

ORDER, AUGMENT, CLUSTER, CROPS, SELECT = 1, 2, 3, 4, 5


def derive_seed(*parts: int) -> int:
    """An independent 63-bit seed for each tuple of non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)
