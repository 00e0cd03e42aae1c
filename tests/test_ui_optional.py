"""The UI screenshot is the demo's one optional step: without Chromium it is skipped with one line, not a crash."""

from core.cli import main


def test_screenshot_without_chromium_is_skipped_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium, chromium-browser or google-chrome on it
    png = tmp_path / "ui.png"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["ui", "--tracking-uri", uri, "--screenshot", str(png), "--if-chromium"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped the MLflow UI screenshot") and "apt-get install chromium" in out
    assert not png.exists()
    assert main(["ui", "--tracking-uri", uri, "--screenshot", str(png)]) == 2  # before any server starts
    assert "apt-get install chromium" in capsys.readouterr().err
