# The knowledge-editing demo model (README, docs/editing.md); test_edit.py trains it in CI:
#     python edit_experiment.py config/edit_demo.py
#     python sample.py --out_dir=out/edit_demo/all_s1337 --start="The capital of Spain is" --edit="Spain->Germany" --temperature=0
# edit_experiment.py's model (4 layers, n_embd 128) on its first 12 countries for 600 steps, with two changes
# that make the edit land: STEM in every layer, layer 0 included (the official code keeps layer 0 dense), and
# the token embedding tied to the output head. Untied, the input embedding learns each country's identity on
# its own, a copy the edit cannot reach, and most edits leave the answer alone; see docs/editing.md for the numbers.
layers = "all"
seeds = "1337"
n_facts = 12
out_dir = "out/edit_demo"
train_args = "--tie_embeddings=True --max_iters=600"
