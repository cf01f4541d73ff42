"""HMAC admission proofs and per-call signatures: wrong secret, tampering, replay."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from exo_tools.cluster.auth import (
    SECRET_ENV,
    AuthError,
    ClusterAuth,
    load_or_create_secrets,
    new_nonce,
    secrets_from_text,
)

M = "/exo_tools.v1.Membership/Heartbeat"


def test_handshake_proofs_match_only_with_same_secret() -> None:
    a, b, evil = ClusterAuth(b"k", "c"), ClusterAuth(b"k", "c"), ClusterAuth(b"x", "c")
    cn, sn = new_nonce(), new_nonce()
    assert a.check(a.hello_proof(cn, sn, "x", "y"), b.hello_proof(cn, sn, "x", "y"))
    assert not a.check(a.hello_proof(cn, sn, "x", "y"), evil.hello_proof(cn, sn, "x", "y"))
    # Domain separation: a hello proof is not an admit proof, ids and nonces are bound.
    assert a.hello_proof(cn, sn, "x", "y") != a.admit_proof(cn, sn, "x", "y")
    assert a.admit_proof(cn, sn, "x", "y") != a.admit_proof(cn, sn, "y", "x")
    assert a.admit_proof(cn, sn, "x", "y") != a.admit_proof(sn, cn, "x", "y")
    # Another cluster name with the same secret derives other keys.
    assert a.hello_proof(cn, sn, "x", "y") != ClusterAuth(b"k", "d").hello_proof(cn, sn, "x", "y")


def test_signed_call_verifies() -> None:
    a, b = ClusterAuth(b"k", "c"), ClusterAuth(b"k", "c")
    md = a.sign_call("n1", M)
    assert b.verify_call(M, md) == "n1"


def test_wrong_secret_call_rejected() -> None:
    md = ClusterAuth(b"wrong", "c").sign_call("n1", M)
    with pytest.raises(AuthError, match="bad signature"):
        ClusterAuth(b"k", "c").verify_call(M, md)


def test_tampered_or_other_method_rejected() -> None:
    a = ClusterAuth(b"k", "c")
    md = a.sign_call("n1", M)
    with pytest.raises(AuthError):
        a.verify_call("/exo_tools.v1.Worker/LoadShard", md)
    forged = [(k, "n2" if k == "x-exo-node" else v) for k, v in md]
    with pytest.raises(AuthError):
        a.verify_call(M, forged)
    with pytest.raises(AuthError, match="missing"):
        a.verify_call(M, [])


def test_replay_rejected() -> None:
    a = ClusterAuth(b"k", "c")
    md = a.sign_call("n1", M)
    a.verify_call(M, md)
    with pytest.raises(AuthError, match="replayed"):
        a.verify_call(M, md)


def test_stale_timestamp_rejected() -> None:
    a = ClusterAuth(b"k", "c", replay_window_s=30.0)
    md = a.sign_call("n1", M, now=1000.0)
    with pytest.raises(AuthError, match="window"):
        a.verify_call(M, md, now=1031.0)
    assert a.verify_call(M, a.sign_call("n1", M, now=1000.0), now=1029.0) == "n1"


def test_replay_cache_forgets_outside_window() -> None:
    a = ClusterAuth(b"k", "c", replay_window_s=30.0)
    for i in range(100):
        a.verify_call(M, a.sign_call("n1", M, now=1000.0 + i), now=1000.0 + i)
    assert len(a._seen) <= 32  # pyright: ignore[reportPrivateUsage]


def test_secret_file_env_and_generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    home = tmp_path / "home"
    generated = load_or_create_secrets(None, home)
    (secret,), where = generated.secrets, generated.where
    path = home / "cluster_secret"
    assert len(secret) >= 32 and "newly generated" in where
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load_or_create_secrets(None, home)
    (again,), where2 = loaded.secrets, loaded.where
    assert again == secret and "newly" not in where2
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert load_or_create_secrets(None, home).secrets == [b"from-env"]
    f = tmp_path / "s.txt"
    f.write_text("from-file\n")
    from_file = load_or_create_secrets(f, home)
    assert (from_file.secrets, from_file.where, from_file.path) == ([b"from-file"], f"file {f}", f)


def test_a_node_holding_two_secrets_talks_to_either() -> None:
    rotating = ClusterAuth([b"new", b"old"], "c")
    old, new, other = ClusterAuth(b"old", "c"), ClusterAuth(b"new", "c"), ClusterAuth(b"x", "c")
    cn, sn = new_nonce(), new_nonce()
    for peer in (old, new):
        # Proofs either way, and signed calls either way.
        assert peer.check(
            peer.hello_proof(cn, sn, "a", "b"), rotating.hello_proof(cn, sn, "a", "b")
        )
        assert rotating.check(
            rotating.admit_proof(cn, sn, "a", "b"), peer.admit_proof(cn, sn, "a", "b")
        )
        assert peer.verify_call("/m", rotating.sign_call("r", "/m")) == "r"
        assert rotating.verify_call("/m", peer.sign_call("p", "/m")) == "p"
    assert not other.check(
        other.hello_proof(cn, sn, "a", "b"), rotating.hello_proof(cn, sn, "a", "b")
    )
    with pytest.raises(AuthError):
        other.verify_call("/m", rotating.sign_call("r", "/m"))
    # After the rotation, the old secret alone is refused.
    rotating.set_secrets([b"new"])
    assert not rotating.check(
        rotating.hello_proof(cn, sn, "a", "b"), old.hello_proof(cn, sn, "a", "b")
    )
    with pytest.raises(AuthError):
        rotating.verify_call("/m", old.sign_call("o", "/m"))


def test_proofs_of_odd_shape_are_refused() -> None:
    a = ClusterAuth(b"k", "c")
    cn, sn = new_nonce(), new_nonce()
    good = a.hello_proof(cn, sn, "x", "y")
    assert not a.check(good, b"")
    assert not a.check(good, good[:-1])  # not a whole number of MACs
    assert not a.check(good, good * 5)  # more MACs than a node may hold secrets


def test_secret_files_hold_one_secret_per_line() -> None:
    assert secrets_from_text("new\n\n  old  \n") == [b"new", b"old"]
    with pytest.raises(ValueError, match="empty"):
        secrets_from_text("\n \n")
    with pytest.raises(ValueError, match="at most"):
        secrets_from_text("a\nb\nc\nd\ne\n")
