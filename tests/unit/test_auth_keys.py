import hashlib
import re

from sqlproxy.auth.keys import API_KEY_PREFIX, generate_api_key, hash_api_key
from sqlproxy.config.models import UserConfig


def test_hash_is_hex_sha256_accepted_by_config() -> None:
    h = hash_api_key("sqp_example")
    assert h == hashlib.sha256(b"sqp_example").hexdigest()
    # The value is what users paste into api_key_sha256, so the config model must accept it.
    assert UserConfig(api_key_sha256=h).api_key_sha256 == h


def test_hash_known_vector() -> None:
    assert hash_api_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_hash_handles_non_ascii() -> None:
    assert hash_api_key("clé") == hashlib.sha256("clé".encode()).hexdigest()


def test_generated_keys_are_prefixed_random_and_url_safe() -> None:
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    for k in keys:
        assert k.startswith(API_KEY_PREFIX)
        assert re.fullmatch(r"sqp_[A-Za-z0-9_-]{43}", k)
