"""The model: ResNet backbone + nn.Transformer (`caption_model`), its layers as functions, the
decoder's key/value cache, and one-file checkpoints.

`CaptionModel` is also the search's PyTorch engine (`init_cache`, `step`). May import `data` and the
foundation (`config`, `files`, `device`); `kv_cache` imports no torch, so an export's search can use
it.
"""
