"""The GPU machine gets every requirement: from its image or as a wheel that scripts/gpu_wheels.sh
fetches (a requirement in neither breaks ``import distill_plugins`` there, as a missing edit-distance package once would have)."""
import os
import re

from conftest import REPO


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_requirement_reaches_the_gpu_machine():
    script = open(os.path.join(REPO, "scripts", "gpu_wheels.sh")).read()
    on_image = {normalise(n) for n in re.search(r"^# ON_IMAGE: (.*)$", script, re.M).group(1).split()}
    fetched = {normalise(n) for n in re.findall(r"([A-Za-z0-9_.-]+)==", script)}
    wanted = set()
    for line in open(os.path.join(REPO, "requirements.txt")):
        line = line.split("#")[0].strip()
        if line:
            wanted.add(normalise(re.split(r"[=<>!~\[ ]", line)[0]))
    assert wanted - on_image - fetched == set()
    assert "rapidfuzz" in fetched
