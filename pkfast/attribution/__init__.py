"""attribution: training-data attribution from the path kernel, and how good it is.

- :mod:`~pkfast.attribution.scores`: query × train scores, top-k proponents and opponents, self-influence —
  streamed over the training set, exact (:class:`Exact`) or sketched (:class:`~pkfast.PathFeatures`);
- :mod:`~pkfast.attribution.lds`: the linear datamodeling score of any score matrix against models retrained on
  random subsets (:func:`lds`), and its bootstrap confidence interval (:func:`lds_ci`);
- :mod:`~pkfast.attribution.harness`: those retrains — seeded subsets (:func:`subsets`) and the user's training
  function run on each, resumably and shared between processes (:func:`retrain`, returning :class:`Retrains`).
"""

from pkfast.attribution.harness import Retrains, retrain, subsets
from pkfast.attribution.lds import lds, lds_ci
from pkfast.attribution.scores import (ATTRIBUTION_K, Exact, TopK, features, scores, self_influence,
                                       top_k)

__all__ = ["Exact", "features", "TopK", "scores", "top_k", "self_influence", "ATTRIBUTION_K", "lds", "lds_ci",
           "subsets", "retrain", "Retrains"]
