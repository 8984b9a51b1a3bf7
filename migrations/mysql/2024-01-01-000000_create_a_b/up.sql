-- Parents and their children (SQLAlchemy's greenlet_orm model).
-- MEDIUMTEXT: up to 16 MiB per value (TEXT stops at 64 KiB).
CREATE TABLE a (
    id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY,
    data MEDIUMTEXT
);

-- Every lazy load of an A's children filters on b.a_id (index b_a_id).
CREATE TABLE b (
    id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY,
    a_id INTEGER NOT NULL,
    data MEDIUMTEXT,
    INDEX b_a_id (a_id),
    CONSTRAINT b_a_id_fk FOREIGN KEY (a_id) REFERENCES a (id)
);
