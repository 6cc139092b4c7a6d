# %% [markdown]
# # 04 · Predict
#
# Uses the checkpoint from 02_train with the decisions 03_evaluate wrote into it: first `predict()`
# from Python, then an upload panel for trying your own images.

# %% tags=["parameters"]
data_dir: str = "data/sample"  # labelled folder whose validation images serve as examples
out_dir: str = ""  # where model.pth and split.json are ("" means models/)
n_examples: int = 3  # validation images to run predict() on
threshold: "Optional[float]" = None  # one threshold for every attribute, or None for the tuned decisions from 03
display_size: int = 256  # side in pixels of the uploaded image in the panel

# %% [markdown]
# ## Setup

# %%
from aimonk import config
from aimonk.data import load_split
from aimonk.predict import predict
from aimonk.widgets import upload_panel

model_path = config.output_dir(out_dir) / config.DEFAULT_MODEL_NAME
images_dir = config.resolve_path(data_dir) / "images"
split_file = model_path.with_name(config.SPLIT_NAME)
examples = load_split(split_file)["val"][:n_examples] if split_file.is_file() else []  # none before 02 has run
examples

# %% [markdown]
# ## `predict()` on a few validation images
#
# `predict(path)` loads the model once, caches it, and prints the image name and the attributes it
# finds present. It also accepts a PIL image or raw bytes. The fine-tuned network never trained on
# these images; with the default cross-fitted probe, the probe part of the model has seen them, so
# treat these as a demonstration, not a score (notebook 03 has the honest figures).

# %%
for name in examples:
    predict(images_dir / name, model=model_path, threshold=threshold)

# %% [markdown]
# The returned result carries the probabilities and the thresholds that decided:

# %%
results = [predict(images_dir / name, model=model_path, threshold=threshold, show=False) for name in examples[:1]]
[(r.probabilities, r.thresholds) for r in results]

# %% [markdown]
# ## Upload panel
#
# Upload an image to see a confidence bar per attribute, green where the attribute is judged
# present. The model runs once per upload; the slider applies one threshold to every attribute
# without re-running it, and the checkbox switches back to the per-attribute decisions tuned in
# 03_evaluate. Files that are not images, or larger than the limit, get a message instead.

# %%
upload_panel(model_path, default_threshold=threshold, display_size=display_size)
