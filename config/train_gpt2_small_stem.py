# GPT-2 small shape (12 layers, 12 heads, 768 wide, 1024 context) with STEM FFNs, on one GPU.
#   python train.py config/train_gpt2_small_stem.py
# The batch is nanoGPT's GPT-2 preset: 12 sequences x 1024 tokens x 40 micro-steps = 491,520 tokens a step.
# gradient_accumulation_steps counts micro-steps over all processes, so the same file on 8 GPUs
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_stem.py
# keeps that global batch, with 5 micro-steps per GPU.
# Memory: the STEM tables are 50304 x 11 layers x 2048 = 1.13B parameters. In float32 with full Adam moments
# they take 12 bytes each (13.6 GB); in bfloat16 with rowwise second moments 4 (4.5 GB), which the quality runs
# in docs/results.md measured within 0.02 nats of float32. `python train.py config/train_gpt2_small_stem.py
# --plan=True --plan_gpu_gb=80` prints the whole plan.

out_dir = "out-gpt2-small-stem"
# FineWeb-Edu's 10B-token sample (docs/data.md): fetch it, then tokenize it into data/fineweb_edu:
#   hf download HuggingFaceFW/fineweb-edu --repo-type=dataset --include "sample/10BT/*" --local-dir=fineweb-edu
#   python prepare.py --input=fineweb-edu/sample/10BT --name=fineweb_edu
dataset = "fineweb_edu"  # any corpus prepare.py made works: --dataset=NAME

# model
n_layer = 12
n_head = 12
n_embd = 768
d_ff = 2048  # SwiGLU's 8/3 * 768 rounded to 64: a STEM layer has the FFN FLOPs of a 2-matrix MLP of this width
block_size = 1024
ffn = "stem"
stem_layers = None  # every layer but the first, as in the official code

# batch
batch_size = 12
gradient_accumulation_steps = 40

# schedule: nanoGPT's peak and floor, over ~25B tokens (nanoGPT's own run is 600k steps, ~300B tokens)
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 50000
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# STEM table: row-wise AdamW on the backbone's schedule. The official code decays the tables like the backbone
# (weight_decay 0.1) and clips them separately (stem_weight_decay=0.1, stem_clip="separate" here); on the quality
# runs in docs/results.md that was worse than no table decay with joint clipping, so these stay the defaults.
stem_optim = "sparse"
stem_lr_mult = 1.0
stem_weight_decay = 0.0
stem_clip = "joint"
stem_dtype = "bfloat16"
stem_state = "rowwise"

eval_interval = 1000
eval_iters = 200
log_interval = 10

device = "cuda"
dtype = "bfloat16"
compile = True
