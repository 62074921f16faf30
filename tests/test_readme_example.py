"""README.md's Python API example, run exactly as written (extracted from the file, no line substituted): offline,
on its tiny ViT and scikit-learn's digits, then the loading snippet after it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from hf_vit_compress.publish import check_publishable

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_blocks(section: str) -> list[str]:
    """The ```python blocks of one `## section` of README.md, in order."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], flags=re.S)


def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    example, loading = readme_python_blocks("Python API")[:2]
    code = "\n".join(line.split("#")[0] for line in example.splitlines())
    assert "..." not in code  # complete: nothing left for the reader to fill in (comments aside)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, f"{README}:Python API example", "exec"), namespace)

    metrics, dense = namespace["metrics"], namespace["dense_metrics"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= dense["dense_accuracy"] <= 1.0
    assert "eval_top5_accuracy" in metrics  # compute_metrics was passed: evaluate() gives more than the loss
    assert f"{dense['dense_accuracy']} {metrics['eval_accuracy']}" in capsys.readouterr().out
    assert namespace["trainer"].method.search_finished
    check_publishable(tmp_path / "digits-vit-ofb-50")  # model, image processor, sidecars, card

    # The loading snippet, in a fresh process where `import hf_vit_compress` fails (the README says "without this
    # package"); `digits` is given the one test image the snippet classifies.
    namespace["digits"]["test"][0]["image"].save(tmp_path / "digit.png")
    script = ("import sys\nsys.modules['hf_vit_compress'] = None\nfrom PIL import Image\n"
              "digits = {'test': [{'image': Image.open('digit.png')}]}\n" + loading +
              "import json\nprint('RESULT', json.dumps(type(model).__module__))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"\[\{'label': '\d', 'score': [0-9.e-]+\}", result.stdout)  # the snippet's print
    module = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert module.startswith("transformers_modules")  # the model class came from the folder's own code
