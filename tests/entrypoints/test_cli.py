import subprocess
import sys


def test_generate_command_prints_text(tiny_llama_dir):
    proc = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "generate", "--model",
                           str(tiny_llama_dir), "--prompt", "Hello", "--max-tokens", "5", "--ignore-eos"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "finish_reason=length, tokens=5" in proc.stdout


def test_chat_command_streams_a_reply(tiny_llama_dir):
    proc = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "chat", "--model",
                           str(tiny_llama_dir), "--max-tokens", "4", "--ignore-eos"],
                          input="Hi there\n\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "assistant> " in proc.stdout


def test_bad_model_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "generate", "--model",
                           str(tmp_path / "missing"), "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr
