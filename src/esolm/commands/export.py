"""``esolm export CKPT DIR`` — a training checkpoint to a ``from_pretrained`` folder.

The folder gets the EMA weights (``model.safetensors`` + ``config.json`` with the method dict, via
``esolm.io.save_pretrained``), the tokenizer (``tokenizer.json`` + ``esolm_tokenizer.json``) and the
training recipe (``training_config.yaml``).
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (.ckpt), e.g. runs/x/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="folder to write")


def run(args) -> int:
    from pathlib import Path

    import yaml

    from esolm.io import save_pretrained
    from esolm.methods import as_method
    from esolm.training import model_from_checkpoint

    model, method, tokenizer, config = model_from_checkpoint(args.checkpoint)
    out = Path(args.out_dir)
    save_pretrained(model, out, method=method)
    tokenizer.save(out)
    tmp = out / ".training_config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(out / "training_config.yaml")
    n_params = model.num_parameters()
    print(f"exported {args.checkpoint} -> {out} ({as_method(method).label}, {n_params} parameters, EMA weights)")
    return 0
