"""The schema revision this code needs: the head of store/migrations (a test
holds the two equal). Its own module, so a quick read need not load the store."""

HEAD = "0010"
