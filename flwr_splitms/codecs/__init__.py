"""Compression codecs for cut-layer activations: MS and the paper's baselines.

>>> from flwr_splitms.codecs import get_codec, Payload, decode_bytes
>>> codec = get_codec("ms", ratio=0.99, bits=2)
>>> payload = codec.encode(x)                      # doctest: +SKIP
>>> x_hat = codec.decode(Payload.from_bytes(payload.to_bytes()))  # doctest: +SKIP
>>> payload, err = codec.encode_measured(x)          # doctest: +SKIP
>>> x_hat = decode_bytes(payload.to_bytes(), device="cuda")  # doctest: +SKIP

Encoding and decoding run in torch on the tensor's (or the requested) device; the bytes are
the same on every device. ``encode_measured`` also returns the relative error of the decoded
tensor, computed from what the encoder already has.

Codecs (``get_codec(name, **params)``):

* ``none`` -- raw values (``identity``)
* ``qu``   -- b-bit min-max uniform quantization (``quantize``)
* ``sp``   -- Top-k sparsification, bitmap or index positions (``topk``)
* ``rt``   -- randomized Top-k of Zheng et al. (``randtopk``)
* ``ms``   -- Mask-Encoded Sparsification, the paper's method (``ms``)

The wire format and its header overhead are documented in ``payload``. Layering, bottom up:
``params``, ``dtypes``, ``error``, ``selection``; ``registry`` (names and wire ids); ``payload``
(the dataclass, limits, errors, the bytes layout); ``bitpack``, ``positions``, ``entropy``;
``base`` (``Codec``); ``dispatch`` (name or bytes to the right codec); the codecs; ``downlink``.
"""

from . import halfprec, identity, ms, quantize, randtopk, topk  # noqa: F401  (register the codecs)
from .base import Codec
from .dispatch import decode_bytes, get_codec
from .error import compression_error
from .payload import Payload, PayloadError
from .registry import codec_names

__all__ = [
    "Codec",
    "Payload",
    "PayloadError",
    "codec_names",
    "compression_error",
    "decode_bytes",
    "get_codec",
]
