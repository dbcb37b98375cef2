"""Run with the Python of ImageReward's side environment. A small ImageReward of the real BLIP layout: the
package's own ImageReward class with a one-block ViT-L (the real model has 24 blocks of the same shape), a
one-layer BERT with cross-attention (med_config.json's keys) and a small WordPiece vocabulary.

    python imagereward_tiny.py make FOLDER        writes tiny.pt, med_config.json, tokenizer/vocab.txt
    python imagereward_tiny.py ARGS...            the evaluation's worker (its arguments), one-block ViT-L
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer" / "benchmarks"))
import imagereward_worker as worker  # noqa: E402

WORDS = "a an the woman man girl boy person child hand face smiling waving holding red blue cup dog".split()
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 512,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": 12, "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 5 + len(WORDS) + 2, "encoder_width": 1024, "add_cross_attention": True}


def one_block_vit():
    _, blip_pretrain = worker.import_imagereward()
    from ImageReward.models.BLIP.vit import VisionTransformer

    def create_vit(vit, image_size, *args, **kwargs):
        assert vit == "large"
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=1024, depth=1, num_heads=16), 1024
    blip_pretrain.create_vit = create_vit


def make(folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
                                                    + "\n")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    one_block_vit()
    model_module, blip_pretrain = worker.import_imagereward()
    blip_pretrain.init_tokenizer = worker.tokenizer_loader(str(folder / "tokenizer"))
    torch.manual_seed(0)
    model = model_module.ImageReward(med_config=str(folder / "med_config.json"), device="cpu")
    for p in model.mlp.parameters():            # the reward head's init is tiny: spread the scores
        torch.nn.init.normal_(p, std=0.2)
    torch.save(model.state_dict(), folder / "tiny.pt")


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make(Path(sys.argv[2]))
    else:
        one_block_vit()
        sys.exit(worker.main(sys.argv[1:]))
