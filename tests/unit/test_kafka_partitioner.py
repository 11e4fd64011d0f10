"""The fast murmur2 partitioner must choose exactly the partition aiokafka's (Java's) would."""

import random

from aiokafka.partitioner import DefaultPartitioner, murmur2

from sluice import kafka


def test_murmur2_matches_aiokafka_for_every_length_and_byte() -> None:
    rng = random.Random(6)
    keys = [bytes(rng.randrange(256) for _ in range(n)) for n in range(0, 70) for _ in range(30)]
    keys += [b"", b"\xff" * 33, b"\x00" * 9, b"request-id-0123456789abcdef"]
    for key in keys:
        assert kafka.murmur2(key) == murmur2(key), key


def test_partition_choice_matches_the_default_partitioner() -> None:
    rng = random.Random(7)
    for partitions in (1, 3, 6, 12):
        all_partitions = list(range(partitions))
        for _ in range(500):
            key = rng.randbytes(32).hex().encode()
            assert kafka.partition_for(key, all_partitions, all_partitions) == DefaultPartitioner()(
                key, all_partitions, all_partitions
            )
    assert kafka.partition_for(None, [0, 1, 2], [1]) == 1
