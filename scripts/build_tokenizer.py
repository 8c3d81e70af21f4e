"""Train the tiny-mixtral tokenizer on the bundled corpus and write it to mtg_core/assets/tokenizer.

Run from the repository root: `python scripts/build_tokenizer.py`. The result is committed, so no run
of mtg-train needs this script or a network; rerun it when the corpus changes (the tiny model cache is keyed by the tokenizer, so it rebuilds).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "mtg_core" / "assets" / "tokenizer"
VOCAB_SIZE = 2048
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def corpus():
    for path in sorted(ROOT.glob("mtg_expert_*/mtg_expert_*/data/*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                yield record["input"]
                yield record["output"]
    for path in sorted(ROOT.glob("mtg_expert_*/mtg_expert_*/template.txt")):
        yield path.read_text(encoding="utf-8")


def main():
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
