"""PyPI ``ditto-client`` (a Kiota client generated from Ditto's OpenAPI document), unmodified.

Against a real ``twinstore serve`` process: create, read, modify, merge and delete things and
their parts, policies, search (RQL filter, namespaces, fields, sort, size, cursor, form POST)
and count, and Ditto's error bodies as the client's ``AdvancedError``.

The generated client declares no response for single attribute/property values (``GET
/attributes/{path}`` returns ``None``, whatever the server answers) and sends only JSON objects
as their bodies; those are limits of the client, so values are read through their parents.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from ditto_client import BasicAuthProvider
from ditto_client.generated.api.two.search.things.count.count_post_request_body import (
    CountPostRequestBody,
)
from ditto_client.generated.api.two.search.things.count.count_request_builder import (
    CountRequestBuilder,
)
from ditto_client.generated.api.two.search.things.things_post_request_body import (
    ThingsPostRequestBody,
)
from ditto_client.generated.api.two.search.things.things_request_builder import (
    ThingsRequestBuilder as SearchRequestBuilder,
)
from ditto_client.generated.api.two.things.item.attributes.item.with_attribute_path_put_request_body import (
    WithAttributePathPutRequestBody,
)
from ditto_client.generated.api.two.things.item.features.item.properties.item import (
    with_property_path_put_request_body as property_body,
)
from ditto_client.generated.api.two.things.things_request_builder import ThingsRequestBuilder
from ditto_client.generated.ditto_client import DittoClient
from ditto_client.generated.models.advanced_error import AdvancedError
from ditto_client.generated.models.attributes import Attributes
from ditto_client.generated.models.feature import Feature
from ditto_client.generated.models.feature_properties import FeatureProperties
from ditto_client.generated.models.new_policy import NewPolicy
from ditto_client.generated.models.new_thing import NewThing
from ditto_client.generated.models.patch_thing import PatchThing
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_http.httpx_request_adapter import HttpxRequestAdapter

from tests.api.helpers import full_access
from tests.conftest import AUTH, ServerProcess
from twinstore.runtime import Runtime
from twinstore.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(settings: Settings, runtime: Runtime) -> Iterator[ServerProcess]:
    proc = ServerProcess(settings).start()
    yield proc
    proc.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def ditto(server: ServerProcess) -> AsyncIterator[DittoClient]:
    async with httpx.AsyncClient(timeout=30) as http:
        adapter = HttpxRequestAdapter(
            BasicAuthProvider(user_name=AUTH[0], password=AUTH[1]), http_client=http
        )
        adapter.base_url = server.url
        yield DittoClient(adapter)


def search_query(**params: Any) -> RequestConfiguration[Any]:
    return RequestConfiguration(
        query_parameters=SearchRequestBuilder.ThingsRequestBuilderGetQueryParameters(**params)
    )


def count_query(**params: Any) -> RequestConfiguration[Any]:
    return RequestConfiguration(
        query_parameters=CountRequestBuilder.CountRequestBuilderGetQueryParameters(**params)
    )


async def ditto_error(call: Any) -> AdvancedError:
    with pytest.raises(AdvancedError) as caught:
        await call
    return caught.value


async def test_create_read_modify_merge_delete(ditto: DittoClient) -> None:
    thing_id = f"org.pyclient{secrets.token_hex(4)}:pump"
    thing = ditto.api.two.things.by_thing_id(thing_id)
    doc = {"attributes": {"site": "north", "n": 1}, "features": {"temp": {"properties": {"value": 20}}}}

    created = await thing.put(body=NewThing(additional_data=doc))
    assert created is not None and created.thing_id == thing_id and created.policy_id == thing_id
    assert created.attributes is not None and created.attributes.additional_data == doc["attributes"]
    assert await thing.put(body=NewThing(additional_data=doc)) is None  # 204: replaced

    read = await thing.get()
    assert read is not None and read.thing_id == thing_id
    assert read.attributes is not None and read.attributes.additional_data == {"site": "north", "n": 1}
    assert read.features is not None and read.features.additional_data == doc["features"]
    listed = await ditto.api.two.things.get(
        request_configuration=RequestConfiguration(
            query_parameters=ThingsRequestBuilder.ThingsRequestBuilderGetQueryParameters(
                ids=thing_id, fields="thingId,attributes/site"
            )
        )
    )
    assert listed is not None and [t.thing_id for t in listed] == [thing_id]
    assert listed[0].attributes is not None and listed[0].attributes.additional_data == {"site": "north"}

    # modify: attributes, an attribute (object), feature properties, a property (object), a feature
    await thing.attributes.put(body=Attributes(additional_data={"site": "north", "n": 2}))
    await thing.attributes.by_attribute_path("location").put(
        body=WithAttributePathPutRequestBody(additional_data={"lat": 52.5, "lon": 13.4})
    )
    temp = thing.features.by_feature_id("temp")
    await temp.properties.put(body=FeatureProperties(additional_data={"value": 21.5}))
    await temp.properties.by_property_path("config").put(
        body=property_body.WithPropertyPathPutRequestBody(additional_data={"interval": 10})
    )
    hum = await thing.features.by_feature_id("hum").put(
        body=Feature(properties=FeatureProperties(additional_data={"value": 40}))
    )
    assert hum is not None and hum.properties is not None and hum.properties.additional_data == {"value": 40}
    attributes = await thing.attributes.get()
    assert attributes is not None
    assert attributes.additional_data == {"site": "north", "n": 2, "location": {"lat": 52.5, "lon": 13.4}}
    properties = await temp.properties.get()
    assert properties is not None and properties.additional_data == {
        "value": 21.5,
        "config": {"interval": 10},
    }

    # merge (application/merge-patch+json): null removes
    await thing.patch(body=PatchThing(additional_data={"attributes": {"n": None, "merged": True}}))
    await thing.attributes.patch(body=Attributes(additional_data={"location": {"lon": None}}))
    await temp.properties.patch(body=FeatureProperties(additional_data={"unit": "C"}))
    merged = await thing.get()
    assert merged is not None and merged.attributes is not None and merged.features is not None
    assert merged.attributes.additional_data == {"site": "north", "merged": True, "location": {"lat": 52.5}}
    assert merged.features.additional_data["temp"]["properties"] == {
        "value": 21.5,
        "config": {"interval": 10},
        "unit": "C",
    }
    assert await thing.policy_id.get() == thing_id

    # delete a part, then the thing
    await thing.attributes.by_attribute_path("location").delete()
    await thing.features.by_feature_id("hum").delete()
    after = await thing.get()
    assert after is not None and after.attributes is not None and after.features is not None
    assert "location" not in after.attributes.additional_data
    assert list(after.features.additional_data) == ["temp"]
    await thing.delete()
    error = await ditto_error(thing.get())
    assert error.response_status_code == 404
    assert (error.status, error.error) == (404, "things:thing.notfound")
    assert error.message and thing_id in error.message


async def test_post_generates_an_id(ditto: DittoClient) -> None:
    created = await ditto.api.two.things.post(
        body=NewThing(additional_data={"attributes": {"generated": True}})
    )
    assert created is not None and created.thing_id is not None
    assert created.thing_id.startswith("org.eclipse.ditto:")
    await ditto.api.two.things.by_thing_id(created.thing_id).delete()


async def test_policy_and_whoami(ditto: DittoClient) -> None:
    namespace = f"org.pyclient{secrets.token_hex(4)}"
    policy_id, thing_id = f"{namespace}:policy", f"{namespace}:guarded"
    policy = ditto.api.two.policies.by_policy_id(policy_id)
    await policy.put(body=NewPolicy(additional_data=full_access("nginx:ditto")))
    read = await policy.get()
    assert read is not None and read.policy_id == policy_id
    assert read.entries is not None and "nginx:ditto" in str(read.entries.additional_data)
    created = await ditto.api.two.things.by_thing_id(thing_id).put(
        body=NewThing(additional_data={"policyId": policy_id, "attributes": {"a": 1}})
    )
    assert created is not None and created.policy_id == policy_id
    who = await ditto.api.two.whoami.get()
    assert who is not None and who.default_subject == "nginx:ditto"
    await ditto.api.two.things.by_thing_id(thing_id).delete()
    await policy.delete()
    error = await ditto_error(policy.get())
    assert (error.status, error.error) == (404, "policies:policy.notfound")


async def test_search_and_count(ditto: DittoClient) -> None:
    namespace = f"org.pyclient{secrets.token_hex(4)}"
    for i in range(1, 6):
        site = "north" if i % 2 else "south"
        await ditto.api.two.things.by_thing_id(f"{namespace}:t{i}").put(
            body=NewThing(additional_data={"attributes": {"site": site, "n": i}})
        )

    found = await ditto.api.two.search.things.get(
        request_configuration=search_query(
            filter='eq(attributes/site,"north")', namespaces=namespace, option="sort(-attributes/n)"
        )
    )
    assert found is not None and found.items is not None
    assert [t.thing_id for t in found.items] == [f"{namespace}:t5", f"{namespace}:t3", f"{namespace}:t1"]
    assert found.items[0].attributes is not None
    assert found.items[0].attributes.additional_data == {"site": "north", "n": 5}

    # paging with the cursor, fields restricted
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        option = "sort(+thingId),size(2)" + (f",cursor({cursor})" if cursor else "")
        page = await ditto.api.two.search.things.get(
            request_configuration=search_query(
                filter="gt(attributes/n,1)",
                namespaces=namespace,
                option=option,
                fields="thingId,attributes/n",
            )
        )
        assert page is not None and page.items is not None
        for item in page.items:
            assert item.thing_id is not None and item.attributes is not None
            assert set(item.attributes.additional_data) == {"n"}
            seen.append(item.thing_id)
        cursor = page.cursor
        if cursor is None:
            break
    assert seen == [f"{namespace}:t{i}" for i in range(2, 6)]

    posted = await ditto.api.two.search.things.post(
        body=ThingsPostRequestBody(
            filter='eq(attributes/site,"south")', namespaces=namespace, option="sort(+thingId)"
        )
    )
    assert posted is not None and posted.items is not None
    assert [t.thing_id for t in posted.items] == [f"{namespace}:t2", f"{namespace}:t4"]

    count = ditto.api.two.search.things.count
    assert await count.get(request_configuration=count_query(namespaces=namespace)) == 5
    north = count_query(filter='eq(attributes/site,"north")', namespaces=namespace)
    assert await count.get(request_configuration=north) == 3
    assert (
        await count.post(body=CountPostRequestBody(filter="in(attributes/n,1,2)", namespaces=namespace)) == 2
    )

    error = await ditto_error(
        ditto.api.two.search.things.get(request_configuration=search_query(filter="eq(attributes/site"))
    )
    assert error.status == 400 and error.error and error.message
    await ditto.api.two.things.by_thing_id(f"{namespace}:t1").delete()
    assert await count.get(request_configuration=north) == 2
