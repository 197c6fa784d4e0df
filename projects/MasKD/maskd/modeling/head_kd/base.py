"""The interface of head-level distillation terms, and their registry.

A term is one class in one file, registered with ``@HEAD_KD_REGISTRY.register()``; it states
its yacs keys (``MODEL.MASKD.<CONFIG_KEY>``), checks the student/teacher pair, installs what it
records on the student, and computes its weighted loss. :class:`maskd.MasKD` takes a list of
built terms (``head_kd=[...]``); its ``from_config`` builds every registered term whose
``WEIGHT`` is positive.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode
from torch import nn

from ..._compat import ConfigNameRegistry
from ...utils.extensions import registered_after_the_config
from ...utils.numbers import check_number

__all__ = ["HeadKD", "HEAD_KD_REGISTRY", "add_head_kd_config", "build_head_kd"]

HEAD_KD_REGISTRY = ConfigNameRegistry("MASKD_HEAD_KD", key="CONFIG_KEY")
HEAD_KD_REGISTRY.__doc__ = """Head-level distillation terms of MasKD's stage 2 (HeadKD classes)."""


class HeadKD(nn.Module):
    """One head-level distillation term of stage 2.

    Class attributes:
        CONFIG_KEY: its node under ``MODEL.MASKD`` (``WEIGHT`` 0 there disables it).
        LOSS_NAME: the key of its loss in the training loss dict.
        SAME_GRID: whether it compares teacher and student outputs cell by cell, so that both
            must pad the batch alike (MasKD refuses it for a pair that pads differently).

    Subclasses implement :meth:`add_config`, :meth:`from_config` (keyword arguments of
    ``__init__`` from the node), :meth:`check`, :meth:`wrap` and :meth:`forward`.
    """

    CONFIG_KEY = ""
    LOSS_NAME = ""
    SAME_GRID = False

    def __init__(self, weight: float):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"{type(self).__name__}: the weight must be positive, got {weight}")
        self.weight = weight

    @classmethod
    def add_config(cls, node: CfgNode) -> None:
        """Add the term's keys (with ``WEIGHT = 0.0``: off) to ``node``, its own config node."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, node: CfgNode) -> dict:
        """Keyword arguments of ``__init__`` from the term's config node."""
        raise NotImplementedError

    def check(self, student: nn.Module, teacher: nn.Module) -> None:
        """Raise ValueError, naming the config key, if the pair cannot have this term."""
        raise NotImplementedError

    def wrap(self, student: nn.Module) -> None:
        """Install on the student (once, when the MasKD model is built) what the term reads
        of its forward: transparent recording wrappers, never hooks."""
        raise NotImplementedError

    def forward(
        self, student: nn.Module, teacher: nn.Module, teacher_features: Dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The weighted scalar loss of the current training step.

        Args:
            student: the student (after its training forward of this step).
            teacher: the frozen teacher (eval mode; its heads may run, without gradient).
            teacher_features: level -> (N, C, H, W) features of the teacher's backbone.
        """
        raise NotImplementedError


def add_head_kd_config(maskd_node: CfgNode) -> None:
    """Add the config node of every registered term to ``MODEL.MASKD``."""
    for name, cls in sorted(HEAD_KD_REGISTRY):
        maskd_node[cls.CONFIG_KEY] = CfgNode()
        cls.add_config(maskd_node[cls.CONFIG_KEY])


def build_head_kd(maskd_node: CfgNode) -> List[HeadKD]:
    """The registered terms enabled (``WEIGHT > 0``) in ``MODEL.MASKD``, built.

    Raises:
        KeyError: a registered term has no config node (it was registered after the config
            was made): no term is ever skipped silently.
        ValueError: a ``WEIGHT`` that is not a finite number >= 0.
    """
    terms: List[HeadKD] = []
    for name, cls in sorted(HEAD_KD_REGISTRY):
        node: Optional[CfgNode] = maskd_node.get(cls.CONFIG_KEY)
        if node is None:
            raise registered_after_the_config(
                f"the head-level KD term {cls.__name__} is registered, but the config has no "
                f"MODEL.MASKD.{cls.CONFIG_KEY}"
            )
        check_number(node.WEIGHT, f"MODEL.MASKD.{cls.CONFIG_KEY}.WEIGHT", zero_allowed=True)
        if node.WEIGHT > 0:
            terms.append(cls(**cls.from_config(node)))
    return terms
