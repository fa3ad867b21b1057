"""A real link cut mid-generation (flow.link's scheduled cut between a device and a real tier):
the device goes on alone while the link is down and catches up after it, and every token the
tier settled is still the full model's."""

import time

from cloud.server_config import ServerConfig
from cloud.service import ServerThread, TierSpec
from device import DeviceClient
from flow.link import PROFILES, LinkShaper


def test_a_cut_link_costs_offline_tokens_and_every_tier_token_stays_exact(device_family):
    family_dir, family = device_family
    prompt = [17, 3, 250, 9]
    with ServerThread(TierSpec(family_dir, 0, None, ServerConfig(port=0)), family) as address:
        host, port = address.rsplit(":", 1)
        with LinkShaper((host, int(port)), PROFILES["lan"], cuts=[(1.0, 0.8)]) as link:
            client = DeviceClient(family_dir, exit=0, cloud=link.address, mode="exit",
                                  threshold=1.5, retry_interval=0.2)  # every token escalates
            steps = []
            for step in client.generate(prompt, max_new_tokens=90, ignore_eos=True):
                steps.append(step)
                time.sleep(0.05)  # the reader's pace: 90 tokens outlast the cut by seconds
            ends = [c.end for c in link.connections]
    offline = [s.offline for s in steps]
    assert "cut" in ends or "refused" in ends, ends
    first_offline = offline.index(True)
    assert 0 < first_offline and not offline[-1], offline  # online, cut, online again
    sequence = prompt + [s.token for s in steps]
    for i, step in enumerate(steps):
        exit = 0 if step.offline else family.config.last_exit
        expected = int(family.logits(sequence[:len(prompt) + i], exit=exit)[0, -1].argmax())
        assert step.token == expected, (i, step)
        assert step.tier == ("device" if step.offline else "cloud")
