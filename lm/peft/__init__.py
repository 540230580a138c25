"""Parameter-efficient fine-tuning: LoRA (lora.py); a LoRA run's checkpoints leave out
its frozen base, which lora_base.json names and every restore rebuilds
(lm/train/param_source.py).

    make_model(cfg: TrainConfig, rngs)  -> the run's model: a Transformer, or a LoRAModel
                                           (frozen base + adapters) when lora.rank > 0
"""


def make_model(cfg, rngs):
    from lm.model import Transformer
    if cfg.lora.rank:
        from lm.peft.lora import LoRAModel
        return LoRAModel(cfg.model, cfg.lora, rngs)
    return Transformer(cfg.model, rngs)
