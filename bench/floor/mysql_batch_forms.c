/*
 * Two forms of the program's batch of 1,000 parents on MySQL/MariaDB,
 * prepared, executed and closed as Diesel does with a batch, alternated
 * `reps` times on one connection into a temporary table (BENCHMARKS.md,
 * "W(10,000) on MySQL"):
 *   union:  INSERT ... SELECT over a 1,000-way UNION ALL, whose WHERE reads
 *           the lock mode (the program's batch before it read the mode first);
 *   values: INSERT ... VALUES (?), (?), ... (Diesel's multi-row insert).
 * Prints the mean milliseconds per batch of each and their ratio.
 *
 * Built by bench/mysql_floor.sh (beside mysql_floor):
 *   MYSQL_PWD=<password> mysql_batch_forms <host> <port> <user> <database> <reps>
 */
#include <mysql.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { ROWS = 1000 };

static void die(MYSQL *conn, MYSQL_STMT *stmt, const char *what) {
    fprintf(stderr, "mysql_batch_forms: %s: %s\n", what,
            stmt ? mysql_stmt_error(stmt) : mysql_error(conn));
    exit(1);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Prepares, binds, executes and closes `sql` once; returns its milliseconds. */
static double batch(MYSQL *conn, const char *sql, MYSQL_BIND *binds) {
    double started = now_ms();
    MYSQL_STMT *stmt = mysql_stmt_init(conn);
    if (mysql_stmt_prepare(stmt, sql, strlen(sql))) die(conn, stmt, "prepare");
    if (mysql_stmt_bind_param(stmt, binds)) die(conn, stmt, "bind");
    if (mysql_stmt_execute(stmt)) die(conn, stmt, "execute");
    if (mysql_stmt_affected_rows(stmt) != ROWS) die(conn, stmt, "a batch inserted too few rows");
    mysql_stmt_close(stmt);
    return now_ms() - started;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s <host> <port> <user> <database> <reps>\n", argv[0]);
        return 2;
    }
    int reps = atoi(argv[5]);
    if (reps < 1) {
        fprintf(stderr, "mysql_batch_forms: reps must be positive\n");
        return 2;
    }
    const char *password = getenv("MYSQL_PWD");
    MYSQL *conn = mysql_init(NULL);
    if (!mysql_real_connect(conn, argv[1], argv[3], password ? password : "", argv[4],
                            (unsigned)atoi(argv[2]), NULL, 0)) {
        die(conn, NULL, "connect");
    }
    if (mysql_query(conn, "CREATE TEMPORARY TABLE batch_forms "
                          "(id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY, data MEDIUMTEXT)")) {
        die(conn, NULL, "create");
    }

    static char with_union[64 * ROWS], with_values[16 * ROWS];
    char *end = with_union;
    end += sprintf(end, "INSERT INTO batch_forms (data) SELECT d FROM (SELECT 0 AS n, ? AS d");
    for (int i = 1; i < ROWS; i++) end += sprintf(end, " UNION ALL SELECT %d, ?", i);
    sprintf(end, ") AS batch WHERE @@innodb_autoinc_lock_mode <> 2 ORDER BY n");
    end = with_values;
    end += sprintf(end, "INSERT INTO batch_forms (data) VALUES (?)");
    for (int i = 1; i < ROWS; i++) end += sprintf(end, ", (?)");

    static MYSQL_BIND binds[ROWS];
    static char data[] = "parent data";
    static unsigned long length = sizeof data - 1;
    for (int i = 0; i < ROWS; i++) {
        binds[i].buffer_type = MYSQL_TYPE_STRING;
        binds[i].buffer = data;
        binds[i].buffer_length = length;
        binds[i].length = &length;
    }

    double union_ms = 0, values_ms = 0;
    for (int r = 0; r < reps; r++) {
        /* Alternate which form goes first. */
        if (r % 2) {
            union_ms += batch(conn, with_union, binds);
            values_ms += batch(conn, with_values, binds);
        } else {
            values_ms += batch(conn, with_values, binds);
            union_ms += batch(conn, with_union, binds);
        }
    }
    printf("mysql_batch_forms: %d rows a batch, %d each: union %.2f ms, values %.2f ms a batch, "
           "union / values %.2f\n",
           ROWS, reps, union_ms / reps, values_ms / reps, union_ms / values_ms);
    mysql_close(conn);
    return 0;
}
