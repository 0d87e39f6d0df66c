"""LocalVLMJudge on a random-init tiny LLaVA (a real architecture) built in a temp folder: no hub, no download.

A random model babbles, so every reply must take the unparseable path cleanly: re-asked, counted, recorded
in the ledger, and never an exception.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from t2i_evolve.data import Ledger
from t2i_evolve.errors import ConfigError
from t2i_evolve.judges import LocalVLMConfig, LocalVLMJudge
from t2i_evolve.protocols import Judge
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher, questions_for

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def build_tiny_llava(folder):
    """A byte-level BPE tokenizer, a CLIP-style image processor and a 2-layer LLaVA, random init."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>", "<image>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=image_processor, tokenizer=fast, chat_template=CHAT_TEMPLATE, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    ids = {t: fast.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        image_token_index=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    # One thread: on a small shared machine, two threads per tiny matmul wait on each other (~100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")
    torch.set_num_threads(threads)


def test_random_model_replies_are_unparseable_counted_and_cached(llava_dir, tmp_path):
    teacher = ProceduralTeacher()
    prompts = GrammarPrompts().sample(3, seed=2)
    pairs = [(teacher.draw(p, 0)[0], teacher.draw(p, 1)[0], p) for p in prompts]
    vqa = [(teacher.draw(p, 2)[0], p, questions_for(p)) for p in prompts[:2]]
    config = LocalVLMConfig(model_path=str(llava_dir), reasks=1, max_tokens=6)
    with Ledger(tmp_path / "run") as ledger:
        judge = LocalVLMJudge(config, ledger)
        assert isinstance(judge, Judge) and judge.id.startswith("local:tiny-llava:")
        verdicts = judge.compare_many(pairs)
        answers = judge.answer_many(vqa)
        assert [(v.status, v.winner, v.asks) for v in verdicts] == [("unparseable", None, 2)] * 3
        assert [(v.status, v.answers, v.asks) for v in answers] == [("unparseable", None, 2)] * 2
        assert judge.score(*vqa[0][:2]) is None and judge.compare(*pairs[0]) is None  # cached: no new sends
        assert judge.stats["unparseable"] == 7 and judge.stats["reasks"] == 7 and judge.stats["sent"] == 10
        calls = ledger.calls(caller=judge.id)
        assert len(calls) == 10 and {c.response["status"] for c in calls} == {"unparseable"}
        assert all(isinstance(c.response["reply"], str) for c in calls)

        again = LocalVLMJudge(config, ledger)
        assert again.compare_many(pairs) == verdicts and again.stats["sent"] == 0  # greedy replies, cached


def test_needs_safetensors_weights(llava_dir, tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        LocalVLMJudge(LocalVLMConfig(model_path=str(tmp_path)))
    (tmp_path / "config.json").write_text((llava_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="safetensors"):
        LocalVLMJudge(LocalVLMConfig(model_path=str(tmp_path)))
