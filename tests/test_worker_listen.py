"""The worker hears an admin's request on the control channel at once (issue 14, "Also").

docs/architecture.md says a NOTIFY on the control channel is heard at once;
`crh worker drain|stop` sends one (admin.sql request_workers), and before this
nothing listened: the request waited for the next heartbeat.
"""

from __future__ import annotations

from .conftest import run, script


def test_a_stop_request_is_heard_on_the_control_channel(lab):
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 120"))
    w = lab.worker("w")
    lab.wait_runs(1)

    run([script("crh"), "worker", "stop", "w"], lab.env)

    w.wait_log("stop request heard on crh_worker_control")
    code, report = w.finish()
    assert code == 0 and report["released"] == 1, w.log()
    assert report["stop_reason"] == "stop requested by an admin"
    lab.check_invariants({job_id: "queued"})
