-- Python bytes, Go []byte and Node Buffer bind as BLOB, and SQLite keeps a
-- BLOB in a TEXT column as it is: never equal to the TEXT of the same bytes.
-- A BLOB key would escape its key's order (the claim's probe for an earlier
-- row of the key misses it), a BLOB tenant its tenant's claims, and a BLOB
-- topic would not decode. This trigger casts them to TEXT in the producer's
-- own statement, so no committed row holds one: nothing is rejected (any
-- language may insert), and the bytes are kept as they are, so a value that
-- is not UTF-8 is still dead-lettered for that reason. It uses nothing newer
-- than SQLite 3.8 (an older sqlite3 writing into the file runs it too).
CREATE TRIGGER IF NOT EXISTS {trigger_text} AFTER INSERT ON {table}
    WHEN typeof(NEW.key) = 'blob' OR typeof(NEW.tenant) = 'blob' OR typeof(NEW.topic) = 'blob'
BEGIN
    UPDATE {table} SET key = CAST(key AS TEXT), tenant = CAST(tenant AS TEXT),
        topic = CAST(topic AS TEXT)
    WHERE seq = NEW.seq;
END;

-- Rows written before the trigger existed.
UPDATE {table} SET key = CAST(key AS TEXT), tenant = CAST(tenant AS TEXT),
    topic = CAST(topic AS TEXT)
WHERE typeof(key) = 'blob' OR typeof(tenant) = 'blob' OR typeof(topic) = 'blob';
