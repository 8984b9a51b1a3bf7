-- Parents and their children (SQLAlchemy's greenlet_orm model).
CREATE TABLE a (
    id SERIAL PRIMARY KEY,
    data TEXT
);

CREATE TABLE b (
    id SERIAL PRIMARY KEY,
    a_id INTEGER NOT NULL REFERENCES a (id),
    data TEXT
);

-- Every lazy load of an A's children filters on b.a_id.
CREATE INDEX b_a_id ON b (a_id);
