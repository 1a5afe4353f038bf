"""One algorithm a file: the activation observers (ifmr, hfmg) and the weight algorithms a layer runs after
calibration, in the order its config names (weights.weight_pipeline): nuq codebook fit, gptq or adaround,
scale_refit, nuq level refit, bias_correction."""
from .hfmg import HFMGObserver
from .ifmr import IFMRObserver

OBSERVERS = {"ifmr": IFMRObserver, "hfmg": HFMGObserver}
