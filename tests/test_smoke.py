import httpx


async def test_put_get_roundtrip(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(f"/api/2/things/{thing_id}", json={"attributes": {"a": 1}})
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"rev:1"'
    r = await client.get(f"/api/2/things/{thing_id}", params={"fields": "_revision,attributes"})
    assert r.json() == {"_revision": 1, "attributes": {"a": 1}}
