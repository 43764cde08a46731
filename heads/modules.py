"""Head modules: small classifiers on one tap's features.

Each takes explicit, typed arguments; ``in_features`` and ``num_classes`` are filled in
by the platform from the trunk's tap spec and the head's data, everything else comes
from the head config's ``module`` block.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    """One linear layer on a pooled feature vector.

    Args:
        in_features: width of the tap (``pooled``: the trunk's ``num_features``).
        num_classes: number of labels.
        dropout: dropout before the layer, during training only.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class MLPHead(nn.Module):
    """A two-layer perceptron on a pooled feature vector.

    Args:
        in_features: width of the tap.
        num_classes: number of labels.
        hidden: width of the hidden layer.
        dropout: dropout after the hidden activation, during training only.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
