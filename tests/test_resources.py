"""Resource sources: what each reports, and that bad input never changes a good answer."""

import logging
import os

import pytest

import meshscale
from meshscale import ResourceError
from meshscale.elastic import resources
from meshscale.elastic.resources import Callback, FileSource, ResourceSource, Static


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "meshscale.elastic.resources"]


def test_sources_are_reachable_as_meshscale_resources():
    assert meshscale.elastic.resources is resources
    for cls in (resources.Static, resources.FileSource, resources.Callback):
        assert issubclass(cls, ResourceSource)


def test_static_count_is_the_first_n_devices(devices):
    source = Static(3)
    assert source.poll() == devices[:3]
    assert source.announced() == []


def test_static_device_list_is_kept_as_given(devices):
    assert Static([devices[5], devices[2]]).poll() == [devices[5], devices[2]]


@pytest.mark.parametrize("bad", [0, 9, -1, []])
def test_static_rejects_counts_outside_the_devices_that_exist(bad):
    with pytest.raises(ResourceError):
        Static(bad)


def test_file_with_a_count_gives_the_first_n_devices(devices, tmp_path):
    path = tmp_path / "devices"
    FileSource.write(path, 6)
    assert path.read_text().strip() == "6"
    source = FileSource(path)
    assert source.poll() == devices[:6]
    FileSource.write(path, 4)
    assert source.poll() == devices[:4]  # re-read at every poll


@pytest.mark.parametrize("text", ["0,1,2,5", "5 2 1 0", "0, 1,2 ,5\n"])
def test_file_with_device_ids_gives_those_devices_in_device_order(devices, tmp_path, text):
    path = tmp_path / "devices"
    path.write_text(text)
    assert FileSource(path).poll() == [devices[0], devices[1], devices[2], devices[5]]


def test_file_write_of_a_single_id_is_not_read_as_a_count(devices, tmp_path):
    path = tmp_path / "devices"
    FileSource.write(path, [5])
    assert FileSource(path).poll() == [devices[5]]


def test_file_json_gives_devices_and_announced_counts(devices, tmp_path):
    path = tmp_path / "devices"
    FileSource.write(path, 6, announced=[8])
    source = FileSource(path)
    assert source.poll() == devices[:6]
    assert source.announced() == [8]
    path.write_text('{"devices": [1, 3], "next": [4, 8]}')
    assert source.poll() == [devices[1], devices[3]]
    assert source.announced() == [4, 8]


def test_file_counts_and_ids_refer_to_the_given_pool(devices, tmp_path):
    path = tmp_path / "devices"
    path.write_text("2")
    pool = devices[4:]
    assert FileSource(path, devices=pool).poll() == devices[4:6]
    path.write_text("5")  # only 4 devices in the pool
    with pytest.raises(ResourceError):
        FileSource(path, devices=pool)


@pytest.mark.parametrize("bad", [
    "six", "0", "9", "0,1,99", "1,1,2", "", '{"devices": 0}', '{"next": [8]}',
    '{"devices": 4, "next": [0]}', '{"devices": 4, "nxt": [8]}', '{"devices": 4,'])
def test_bad_file_content_keeps_the_last_good_value_with_a_warning(devices, tmp_path, caplog,
                                                                   bad):
    path = tmp_path / "devices"
    FileSource.write(path, 6, announced=[8])
    source = FileSource(path)
    path.write_text(bad)
    with caplog.at_level(logging.WARNING, logger="meshscale.elastic.resources"):
        assert source.poll() == devices[:6]
        assert source.poll() == devices[:6]
    assert source.announced() == [8]
    assert len(warnings_of(caplog)) == 1  # one warning per distinct problem, not per poll
    assert "keeping the last good value (6 devices)" in warnings_of(caplog)[0]
    FileSource.write(path, 2)
    assert source.poll() == devices[:2]  # recovers as soon as the file is good again


def test_count_larger_than_available_is_rejected(devices, tmp_path, caplog):
    path = tmp_path / "devices"
    FileSource.write(path, 8)
    source = FileSource(path)
    FileSource.write(path, 16)
    with caplog.at_level(logging.WARNING, logger="meshscale.elastic.resources"):
        assert source.poll() == devices
    assert "16 devices asked for, only 8 exist" in warnings_of(caplog)[0]


def test_file_deleted_after_start_keeps_the_last_good_value(devices, tmp_path, caplog):
    path = tmp_path / "devices"
    FileSource.write(path, 3)
    source = FileSource(path)
    os.remove(path)
    with caplog.at_level(logging.WARNING, logger="meshscale.elastic.resources"):
        assert source.poll() == devices[:3]
    assert warnings_of(caplog)


def test_missing_or_bad_file_at_construction_raises_unless_a_default_is_given(
        devices, tmp_path, caplog):
    path = tmp_path / "devices"
    with pytest.raises(ResourceError, match="FileSource.write"):
        FileSource(path)
    path.write_text("lots")
    with pytest.raises(ResourceError):
        FileSource(path)
    os.remove(path)
    with caplog.at_level(logging.WARNING, logger="meshscale.elastic.resources"):
        source = FileSource(path, default=2)
    assert source.poll() == devices[:2]
    assert warnings_of(caplog)
    FileSource.write(path, 5)
    assert source.poll() == devices[:5]


def test_file_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "devices"
    for value in (8, [0, 1, 2], 4):
        FileSource.write(path, value)
    assert [p.name for p in tmp_path.iterdir()] == ["devices"]
    assert path.read_text() == "4\n"


def test_callback_returning_devices(devices):
    chosen = [devices[0], devices[1], devices[6]]
    assert Callback(lambda: chosen).poll() == chosen


def test_callback_returning_a_count_gives_the_first_n_devices(devices):
    answers = iter([2, 7])
    source = Callback(lambda: next(answers), announced=lambda: [8])
    assert source.poll() == devices[:7]  # the first answer was read at construction
    assert source.announced() == [8]


def test_callback_failure_keeps_the_last_good_value_with_a_warning(devices, caplog):
    answers = iter([4, 0, RuntimeError("scheduler unreachable"), 12])

    def fn():
        value = next(answers)
        if isinstance(value, Exception):
            raise value
        return value

    source = Callback(fn)
    with caplog.at_level(logging.WARNING, logger="meshscale.elastic.resources"):
        assert [source.poll() for _ in range(3)] == [devices[:4]] * 3
    messages = warnings_of(caplog)
    assert len(messages) == 3
    assert "scheduler unreachable" in messages[1]
    assert "12 devices asked for" in messages[2]


def test_callback_that_fails_on_its_first_call_raises():
    with pytest.raises(ResourceError, match="first call"):
        Callback(lambda: 0)


def test_callback_returning_a_repeated_device_is_refused_naming_callback_and_device(devices):
    def two_of_device_1():
        return [devices[0], devices[1], devices[1]]

    with pytest.raises(ResourceError) as refused:
        Callback(two_of_device_1)
    message = str(refused.value)
    assert "\n" not in message
    assert "two_of_device_1" in message  # the callback
    assert f"device {devices[1]} appears 2 times in device ids [0, 1, 1]" in message
    assert "return distinct jax devices or a positive count" in message


def test_callback_repeating_a_device_later_keeps_the_last_good_value(devices, caplog):
    answers = iter([[devices[2], devices[3]], [devices[3], devices[3]]])
    source = Callback(lambda: next(answers))
    with caplog.at_level(logging.WARNING, logger="meshscale.elastic.resources"):
        assert source.poll() == [devices[2], devices[3]]
    assert f"device {devices[3]} appears 2 times" in warnings_of(caplog)[0]


def test_static_refuses_a_repeated_device(devices):
    with pytest.raises(ResourceError, match=rf"Static resources: device {devices[5]} appears 2 "
                                            r"times in device ids \[5, 2, 5\]: pass"):
        Static([devices[5], devices[2], devices[5]])
