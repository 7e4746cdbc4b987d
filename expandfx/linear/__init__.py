"""Linear maps and their exact folding; no ``nn.Module`` code lives here.

- :mod:`expandfx.linear.ir` — ``Affine`` / ``Seq`` / ``Par`` / ``Identity`` and BatchNorm
  as an affine map;
- :mod:`expandfx.linear.fold` — one ``Affine`` for any legal tree (legality checked);
- :mod:`expandfx.linear.compose` — kernel composition and bias propagation of chains (the
  arithmetic ``fold`` and collapsed execution share);
- :mod:`expandfx.linear.costs` — multiply-accumulates, from shapes alone.
"""

from .fold import fold
from .ir import Affine, Geometry, Identity, Par, Seq, batchnorm

__all__ = ["Affine", "Geometry", "Identity", "Par", "Seq", "batchnorm", "fold"]
