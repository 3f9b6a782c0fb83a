from ndm_seq.memory import __main__ as demo


def test_demo_memory_learns_to_decompose(capsys):
    demo.main(["--steps", "200", "--latent-dim", "16"])
    out = capsys.readouterr().out
    before = float(out.split("before  relative ||z - z'||: ")[1].split()[0])
    after = float(out.split("after   relative ||z - z'||: ")[1].split()[0])
    # Collinear slots at init recover little of z; trained slots span its subspace.
    assert before > 0.5
    assert after < before / 10


def test_readme_shows_the_demo_as_it_prints_and_says_the_after_line_varies(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    demo.main([])  # the README's `python -m ndm_seq.memory`: default settings
    out = capsys.readouterr().out
    before = next(line for line in out.splitlines() if line.startswith("before "))
    assert before in readme  # deterministic: the README shows this very line
    shown = [float(x) for x in re.findall(r"after   relative \|\|z - z'\|\|: ([0-9.]+)", readme)]
    after = float(out.split("after   relative ||z - z'||: ")[1].split()[0])
    # The after line varies with the machine; the README says so and shows the range.
    assert "vary with the machine" in readme and len(shown) >= 2
    assert min(shown) / 3 < after < max(shown) * 3


def test_gitignore_covers_every_recipes_prepared_folder():
    import subprocess
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    folders = {
        yaml.safe_load(p.read_text())["data"]["prepared_dir"] for p in root.glob("recipes/*/*.yaml")
    }
    assert any("prepared-" in f for f in folders)
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *(f"{f}/train/data.arrow" for f in folders)],
        cwd=root, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert sorted(ignored.stdout.split()) == sorted(f"{f}/train/data.arrow" for f in folders)
