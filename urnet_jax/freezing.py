"""Freezing the enhancer of an `EnhanceClassify` model while its classifier trains.

Used for methods whose enhancer is trained separately (RSGUNet, Huang et al. 2018): phase 1 fits the
enhancer on its own loss; phase 2 trains only the classifier on the frozen enhancer's outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

ENHANCER = "enhancer"  # the top-level parameter collection of EnhanceClassify's enhancer


def freeze_enhancer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on every parameter except the subtree params['enhancer'], whose updates are zero.

    The frozen subtree keeps no optimiser state (no momentum, no weight decay). The enhancer should also
    be applied with train=False in that phase, so that BatchNorm statistics, if it has any, stay fixed.
    """

    def labels(params: Any) -> Any:
        return {name: jax.tree.map(lambda _: "frozen" if name == ENHANCER else "trained", subtree)
                for name, subtree in params.items()}

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
