"""``esolm export CKPT DIR`` — a training checkpoint (or any model ``esolm.io.load_model`` reads) to an
esolm ``from_pretrained`` folder, written atomically.

The folder gets the EMA weights (``model.safetensors`` + ``config.json`` with the method dict, via
``esolm.io.save_pretrained``), the tokenizer (``tokenizer.json`` + ``esolm_tokenizer.json``) and the
training recipe (``training_config.yaml``) when the checkpoint carries them.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (.ckpt), e.g. runs/x/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="folder to write")


def run(args) -> int:
    from esolm.io import check_writable, load_model, save_pretrained

    check_writable(args.out_dir, folder=True)
    loaded = load_model(args.checkpoint)
    save_pretrained(loaded.model, args.out_dir, loaded.method, tokenizer=loaded.tokenizer, recipe=loaded.recipe)
    print(f"exported {args.checkpoint} -> {args.out_dir} ({loaded.method.label}, "
          f"{loaded.model.num_parameters()} parameters, EMA weights where the checkpoint has them)")
    return 0
