"""Lightning callbacks for LoMix, installed as ``lomix_lightning.callbacks``."""

__all__: list[str] = []
