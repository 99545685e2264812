import subprocess
import sys

import pytest

from ampipe.worker import commands
from ampipe.worker.commands import command


def test_register_and_look_up():
    @command("test_registry_cmd")
    def handler(args, ctx):
        return args["x"] + 1

    assert commands.get("test_registry_cmd") is handler
    assert "test_registry_cmd" in commands.names()
    assert commands.get("no_such") is None


def test_two_handlers_for_one_name_is_an_error():
    @command("test_dup_cmd")
    def first(args, ctx):
        return 1

    with pytest.raises(ValueError, match="command 'test_dup_cmd' is registered twice"):
        @command("test_dup_cmd")
        def second(args, ctx):
            return 2


def test_import_ampipe_and_the_registry_without_pyzmq():
    code = (
        "import sys; sys.modules['zmq'] = None\n"
        "import ampipe, ampipe.worker, ampipe.worker.commands, ampipe.worker.protocol, ampipe.worker.builtin\n"
        "try:\n"
        "    import ampipe.worker.loop\n"
        "except ImportError:\n"
        "    print('loop needs zmq')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loop needs zmq"
