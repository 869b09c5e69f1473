"""`pip install gyre` needs only torch, numpy and ninja: the layers, the Trainer and the command
line import without the tasks' libraries, and a task started without them names the extra."""

import subprocess
import sys
import textwrap

from gyre.cli import _task_parser
from gyre.tasks import TASKS, get

BLOCKED = ("aeon", "statsmodels", "pandas", "sklearn", "matplotlib", "tensorboard", "tomli_w",
           "tqdm", "captum")

_SCRIPT = textwrap.dedent("""
    import sys
    for m in {blocked!r}:
        sys.modules[m] = None  # import m now raises ImportError, as when not installed
    import torch
    from torch import nn
    import gyre.nn, gyre.train, gyre.cli
    from gyre.train import Trainer, TrainConfig
    from gyre.nn import Recurrent

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = Recurrent("gru", 2, 3, batch_first=True, backend="reference")
        def forward(self, x, state=None, *, lengths=None):
            out, state = self.rnn(x, state, lengths=lengths)
            return out, state

    data = [(torch.randn(4, 2), torch.randn(4, 3)) for _ in range(4)]
    cfg = TrainConfig(epochs=1, batch_size=2, progress=False, tensorboard=False, device="cpu")
    Trainer(M(), nn.functional.mse_loss, cfg).fit(data)
    sys.exit(gyre.cli.main(["train", "classify", "--epochs", "1"]))
""")


def test_core_runs_without_the_tasks_extra_and_a_task_names_it():
    p = subprocess.run([sys.executable, "-c", _SCRIPT.format(blocked=BLOCKED)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gyre: error: task: classify needs the tasks extra")
    assert "pip install 'gyre[tasks]'" in err[0] and "aeon" in err[0]


def test_every_flag_has_help_from_its_field_documentation():
    for task in TASKS:
        parser = _task_parser(task, get(task))
        text = parser.format_help()
        assert "``" not in text and ":class:" not in text and ":meth:" not in text
        for action in parser._actions:
            if action.dest in ("help",):
                continue
            words = (action.help or "").split("(default")[0].strip(" ;")
            assert len(words) >= 8, (task, action.option_strings, action.help)
