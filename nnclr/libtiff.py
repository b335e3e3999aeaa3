"""libtiff's own messages on stderr, which the ``nnclr`` command turns off (:func:`quiet_libtiff`).

Kept out of :mod:`nnclr.data` so that the command line can call it without importing torch.
"""

from __future__ import annotations

import ctypes


def quiet_libtiff() -> bool:
    """Stop libtiff printing its warnings and errors on stderr; True when done (False: Pillow without libtiff).

    A corrupt TIFF printed up to a few lines each from C, bypassing Python, beside the one warning line nnclr
    writes for all unreadable files (171 lines for a folder of mutated TIFFs). The reason still reaches nnclr:
    Pillow raises it ("decoder error -2"). libtiff's handlers are process-wide settings made once here (no
    cost per image, safe with decoding threads and forked loader workers, which inherit it); redirecting fd 2
    around each decode would be process-wide too, hiding other threads' messages while it lasted. For the
    command line only (:func:`nnclr.cli.main`): a library leaves its caller's libtiff as it is.
    """
    from PIL import _imaging

    try:  # libtiff's symbols through Pillow's extension, which links the very copy Pillow uses
        library = ctypes.CDLL(_imaging.__file__)
        for name in ("TIFFSetWarningHandler", "TIFFSetErrorHandler"):
            setter = getattr(library, name)
            setter.argtypes, setter.restype = [ctypes.c_void_p], ctypes.c_void_p
            setter(None)
    except (OSError, AttributeError):  # Pillow built without libtiff, or linked so that dlsym cannot see it
        return False
    return True
