"""SecAgg's consistency check (Bonawitz et al. 2017, the actively-secure variant): survivors sign the
survivor list before revealing shares. Honest runs sum the same; a server that sends different lists to
different clients, or too short a list, makes the honest clients abort before they reveal anything."""

import numpy as np
import pytest
from test_deploy_secagg import SECURE, SecureClients
from test_deploy_servicer import LiveRound
from test_secagg import IDS, _no_drops, _quantized_updates

from fedloom.privacy.secagg import Params, ProtocolAborted, SecAggClient, SecAggServer, _pack_blobs, _pack_ids
from fedloom.privacy.secagg_round import answer, run_protocol
from fedloom.runner import run

D = 50
MASK = np.uint64((1 << 32) - 1)


def test_with_the_check_the_sum_is_the_same_and_its_phase_is_counted():
    inputs = _quantized_updates(D, seed=2)
    drops = {**_no_drops(), "masked_input": {IDS[3]}, "consistency": {IDS[5]}, "unmask": {IDS[7]}}
    plain = run_protocol(inputs, Params(32, D + 1, 12), 1, drops)
    checked = run_protocol(inputs, Params(32, D + 1, 12, consistency=True), 1, drops)
    expected = sum(v for u, v in inputs.items() if u != IDS[3]) & MASK
    assert np.array_equal(plain.total, expected) and np.array_equal(checked.total, expected)
    assert checked.summed == plain.summed and IDS[5] in checked.summed  # signing late does not drop its input
    assert checked.costs.survivors["consistency"] == 18 and checked.costs.up["consistency"] == 18 * 64
    assert "consistency" not in plain.costs.survivors


def _through_masked_input(threshold: int):
    """Honest clients and server through the masked-input phase: the clients, the server, who sent y_u."""
    inputs = _quantized_updates(D, seed=4)
    params = Params(32, D + 1, threshold, consistency=True)
    clients, server = {u: SecAggClient(u, params) for u in IDS}, SecAggServer(params, 0)
    outgoing = None
    for phase, step in (("advertise", lambda m: server.collect_keys(list(m.values()))),
                        ("share_keys", server.route_shares),
                        ("masked_input", server.collect_masked)):
        messages = {u: answer(c, phase, None if outgoing is None else outgoing[u], inputs[u])
                    for u, c in clients.items()}
        outgoing = step(messages)
    return clients, server


def test_a_server_sending_different_survivor_lists_makes_the_honest_clients_abort():
    clients, server = _through_masked_input(threshold=12)
    # it tells most clients that IDS[0] dropped (to get its mask key too), the others the truth, and forwards
    # to each only the signatures of the clients on its list
    everyone, without_victim = _pack_ids(IDS), _pack_ids(IDS[1:])
    told = {u: everyone if u in IDS[:8] else without_victim for u in IDS}
    signatures = {u: clients[u].consistency(told[u]) for u in IDS}
    for u in IDS:  # each sees a signature of a list it was not sent: nobody reveals a share
        on_its_list = {v: sig for v, sig in signatures.items() if v in IDS[1:] or told[u] == everyone}
        with pytest.raises(ProtocolAborted, match="signature is not of the survivor list"):
            clients[u].unmask(server.collect_signatures(on_its_list))
    shown = server.collect_signatures(signatures)  # all of them: a signer outside its list is refused too
    with pytest.raises(ProtocolAborted, match="not survivors"):
        clients[IDS[10]].unmask(shown)


def test_honest_clients_refuse_a_short_list_unsigned_signatures_and_unmasking_without_the_check():
    clients, server = _through_masked_input(threshold=12)
    with pytest.raises(ProtocolAborted, match="below the threshold"):
        clients[IDS[0]].consistency(_pack_ids(IDS[:11]))
    with pytest.raises(ProtocolAborted, match="before the consistency check"):
        clients[IDS[1]].unmask(_pack_ids(IDS))  # a server skipping the check gets no shares
    lists = {u: clients[u].consistency(_pack_ids(IDS)) for u in IDS[:13]}
    few = _pack_blobs(dict(list(lists.items())[:11]))  # what a malicious server may forward
    with pytest.raises(ProtocolAborted, match="fewer than 12"):
        clients[IDS[0]].unmask(few)
    forged = _pack_blobs({**lists, IDS[2]: bytes(64)})
    with pytest.raises(ProtocolAborted, match=f"client {IDS[2]}'s signature"):
        clients[IDS[0]].unmask(forged)
    assert clients[IDS[0]].unmask(server.collect_signatures(lists))  # honest signatures: it reveals


def test_the_deployed_round_runs_the_check_and_equals_the_simulation():
    config = {**SECURE, "secure_aggregation": {**SECURE["secure_aggregation"], "consistency_check": True}}
    live = LiveRound(config)
    clients = SecureClients(live)
    clients.advertise()
    for _ in range(4):  # share keys, masked input, consistency, unmask
        clients.answer(clients.next_phase())
    live.thread.join(60)
    assert live.record["secagg_survivors_consistency"] == 4 and live.record["secagg_bytes_up_consistency"] == 4 * 64
    assert np.array_equal(live.exp.final_params(live.exp.state).numpy(), run(config).params.numpy())
