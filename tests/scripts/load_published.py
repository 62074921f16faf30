"""Run in a fresh process: load a published folder WITHOUT hf_vit_compress (its import is blocked), through
`trust_remote_code`, and print as JSON what the model and `pipeline()` give for one image.

    python load_published.py FOLDER IMAGE.png
"""

import json
import sys

sys.modules["hf_vit_compress"] = None  # any `import hf_vit_compress` now raises ImportError

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline  # noqa: E402

folder, image_path = sys.argv[1], sys.argv[2]
try:
    import hf_vit_compress  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
image = Image.open(image_path).convert("RGB")
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder)
with torch.no_grad():
    logits = model(**processor(image, return_tensors="pt")).logits[0]
classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
predictions = classifier(image, function_to_apply="none", top_k=model.config.num_labels)  # raw logits, all
print(json.dumps({
    "import_blocked": blocked,
    "model_class": f"{type(model).__module__}.{type(model).__name__}",
    "logits": logits.tolist(),
    "pipeline": predictions,
    "id2label": {str(k): v for k, v in model.config.id2label.items()},
}))
