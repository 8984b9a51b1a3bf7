// @generated automatically by Diesel CLI.

diesel::table! {
    a (id) {
        id -> Integer,
        data -> Nullable<Text>,
    }
}

diesel::table! {
    b (id) {
        id -> Integer,
        a_id -> Integer,
        data -> Nullable<Text>,
    }
}

diesel::joinable!(b -> a (a_id));

diesel::allow_tables_to_appear_in_same_query!(a, b,);
