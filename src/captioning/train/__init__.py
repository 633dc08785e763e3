"""Training: the loop and `TrainState`, runs that resume exactly, SCST and its CIDEr-D reward,
the frozen encoder's feature cache, DistributedDataParallel, and studies (variants of one config,
trained and scored).

May import every layer below it: `eval`, `captioner`, `decode`, `model`, `data` and the foundation.
"""
