"""README.md's Python API example, run exactly as written (extracted from the file, no line substituted): offline,
on its tiny ViT and scikit-learn's digits, then the loading snippet after it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import make_vit_classifier, write_parquet_shards

from hf_vit_compress.cli import main
from hf_vit_compress.publishing.publish import check_publishable

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


def readme_smoke_command() -> list[str]:
    """The CLI section's smoke-test command (the bash block running `train --recipe deit_tiny_ofb`), as argv."""
    text = README.read_text()
    section = text[text.index("\n## CLI\n"):text.index("\n## ", text.index("\n## CLI\n") + 1)]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "--recipe deit_tiny_ofb" in b)
    return shlex.split(block.replace("\\\n", " "), comments=True)


def test_the_readme_smoke_command_runs(tmp_path, monkeypatch):
    """Run as written except what cannot exist here, and only that: the recipe's Hub model becomes a tiny local one
    (an added --model.model_name_or_path), the CIFAR-10 files become test_cli.py's shards (5 classes), and
    output_dir a temporary folder."""
    argv = readme_smoke_command()
    assert argv[:4] == ["hf-vit-compress", "train", "--recipe", "deit_tiny_ofb"]
    make_vit_classifier().save_pretrained(tmp_path / "tiny_vit")
    (tmp_path / "data").mkdir()
    files = write_parquet_shards(tmp_path / "data")
    substitutes = {"--data.train_files": files["train"], "--data.eval_files": files["validation"],
                   "--training.output_dir": [str(tmp_path / "out")]}
    args, index = [], 1
    while index < len(argv):
        token = argv[index]
        args.append(token)
        index += 1
        if token in substitutes:
            while index < len(argv) and not argv[index].startswith("--"):
                index += 1  # the README's values of this option
            args += substitutes.pop(token)
    assert not substitutes, f"the README command no longer sets {sorted(substitutes)}"
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--model.model_name_or_path", str(tmp_path / "tiny_vit")]) == 0
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert report["steps"] == 6
    assert report["compressed_macs"] <= report["target_flops"] * report["dense_macs"]
    assert 0.0 <= report["compressed_accuracy"] <= 1.0
