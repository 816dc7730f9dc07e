# The knowledge-editing demo model (README, "Knowledge editing"):
#     python edit_experiment.py config/edit_demo.py
#     python sample.py --out_dir=out/edit_experiment/all_s1337 --start="The capital of Spain is" --edit="Spain->Germany" --temperature=0
# edit_experiment.py's corpus and model (40 countries, 4 layers, n_embd 128, 500 steps) with two changes:
# STEM in every layer, layer 0 included (the official code keeps layer 0 dense), and the table trained at
# 100x the backbone's learning rate. At the default 1x a country's identity is learned first by its token
# embedding, which the edit leaves alone, and the edit flips few answers; see the README for the numbers.
layers = "all"
seeds = "1337"
train_args = "--stem_lr_mult=100"
